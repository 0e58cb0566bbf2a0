//! An enrolled pod whose workload record has not arrived (Kubernetes enrollment ahead of
//! xDS): its connections wait for the record, then are refused; never passed in
//! plaintext. The same for a destination pod on the inbound side.

use super::*;

/// The mesh config without the workload `name`.
fn without(name: &str) -> String {
    let full = config("");
    let start = full
        .find(&format!("- uid: c//Pod/default/{name}\n"))
        .unwrap();
    let end = full[start + 1..].find("- uid: ").map_or_else(
        || start + full[start..].find("services:").unwrap(),
        |i| start + 1 + i,
    );
    format!("{}{}", &full[..start], &full[end..])
}

/// Waits until `node` is handling a connection (accepted, not finished).
async fn handling(what: &str, node: &Node) {
    eventually(what, || node.ctx.connections.in_flight() == 1).await;
}

#[tokio::test]
async fn a_source_without_a_record_is_refused_after_the_wait_never_passed_plain() {
    // node-a has not heard of its own client pod; a short wait that runs out.
    let m = mesh_waiting(&without("client"), &config(""), Duration::from_millis(100)).await;
    for ip in [SERVER, OUTSIDE] {
        let l = TcpListener::bind((ip, 0)).await.unwrap();
        let dst = l.local_addr().unwrap();
        assert_eq!(m.round_trip(CLIENT, dst, b"plain?").await, None, "to {ip}");
        // Nothing reached the destination, in the mesh or outside it.
        let accepted = tokio::time::timeout(Duration::from_millis(50), l.accept()).await;
        assert!(accepted.is_err(), "{ip} saw a connection");
    }
    eventually("both refused as unknown sources", || {
        m.a.attempts("outbound", "denied", "unknown_source_workload") == 2
    })
    .await;
    assert_eq!(m.a.attempts("outbound", "ok", "-"), 0);
    assert_eq!(m.b.attempts("inbound", "ok", "-"), 0);
}

#[tokio::test]
async fn a_source_whose_record_arrives_during_the_wait_goes_through_the_mesh() {
    // Long enough never to run out here: the record's arrival ends the wait.
    let m = mesh_waiting(&without("client"), &config(""), Duration::from_secs(60)).await;
    let dst = echo(SERVER).await;
    let mut s = m.connect(CLIENT, dst).await;
    s.write_all(b"early").await.unwrap();
    handling("the connection waits", &m.a).await;
    LocalConfig::from_yaml(&config(""))
        .unwrap()
        .apply_to(&m.store);
    let mut buf = [0u8; 5];
    tokio::time::timeout(T, s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"early");
    // Through the destination's node (HBONE), not straight to the pod: node-b carries it.
    assert_eq!(m.b.ctx.connections.count(), 1);
    drop(s);
    eventually("delivered by node-b", || {
        m.b.attempts("inbound", "ok", "-") == 1
    })
    .await;
}

#[tokio::test]
async fn a_destination_whose_record_arrives_during_the_wait_is_delivered() {
    let m = mesh_waiting(&config(""), &without("server"), Duration::from_secs(60)).await;
    let dst = echo(SERVER).await;
    let mut s = m.connect(CLIENT, dst).await;
    s.write_all(b"later").await.unwrap();
    handling("node-b waits for its pod's record", &m.b).await;
    LocalConfig::from_yaml(&config(""))
        .unwrap()
        .apply_to(&m.b.ctx.store);
    let mut buf = [0u8; 5];
    tokio::time::timeout(T, s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"later");
}

#[tokio::test]
async fn a_destination_without_a_record_is_refused_after_the_wait() {
    let m = mesh_waiting(&config(""), &without("server"), Duration::from_millis(100)).await;
    let l = TcpListener::bind((SERVER, 0)).await.unwrap();
    let dst = l.local_addr().unwrap();
    assert_eq!(m.round_trip(CLIENT, dst, b"x").await, None);
    eventually("refused by node-b", || {
        m.b.attempts("inbound", "denied", "not_local_workload") == 1
    })
    .await;
    let accepted = tokio::time::timeout(Duration::from_millis(50), l.accept()).await;
    assert!(accepted.is_err(), "the pod saw a connection");
}
