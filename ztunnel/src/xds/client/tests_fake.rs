//! The client against a scripted, misbehaving ADS server speaking the real protocol over
//! loopback gRPC: garbage resources, unknown types, removals, streams that end or fail.

use std::net::SocketAddr;

use futures::channel::mpsc as fmpsc;
use futures::StreamExt;
use prost::Message;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};

use super::tests::{eventually, test_config};
use super::*;
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use crate::proto::envoy::service::discovery::v3::Resource;
use crate::proto::istio::security as spb;
use crate::proto::istio::workload as wpb;
use crate::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

type Reply = Result<DeltaDiscoveryResponse, Status>;

/// Hands each new stream to the test, which then plays the server's part by hand.
struct FakeAds {
    streams: fmpsc::UnboundedSender<FakeStream>,
}

struct FakeStream {
    requests: fmpsc::UnboundedReceiver<DeltaDiscoveryRequest>,
    replies: fmpsc::UnboundedSender<Reply>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for FakeAds {
    type DeltaAggregatedResourcesStream = fmpsc::UnboundedReceiver<Reply>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let mut inbound = request.into_inner();
        let (req_tx, req_rx) = fmpsc::unbounded();
        tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                if req_tx.unbounded_send(r).is_err() {
                    break;
                }
            }
        });
        let (reply_tx, reply_rx) = fmpsc::unbounded();
        let _ = self.streams.unbounded_send(FakeStream {
            requests: req_rx,
            replies: reply_tx,
        });
        Ok(Response::new(reply_rx))
    }
}

impl FakeStream {
    async fn next(&mut self) -> DeltaDiscoveryRequest {
        tokio::time::timeout(Duration::from_secs(10), self.requests.next())
            .await
            .expect("a request within 10 s")
            .expect("the stream is open")
    }

    /// The two initial subscriptions, by type URL.
    async fn subscriptions(&mut self) -> HashMap<String, DeltaDiscoveryRequest> {
        let mut subs = HashMap::new();
        for _ in 0..2 {
            let r = self.next().await;
            assert!(r.response_nonce.is_empty(), "{r:?}");
            subs.insert(r.type_url.clone(), r);
        }
        subs
    }

    /// Sends a response and returns the client's answer to it.
    async fn push(
        &mut self,
        type_url: &str,
        nonce: &str,
        resources: Vec<Resource>,
        removed: &[&str],
    ) -> DeltaDiscoveryRequest {
        let resp = DeltaDiscoveryResponse {
            system_version_info: format!("sys-{nonce}"),
            resources,
            type_url: type_url.to_string(),
            nonce: nonce.to_string(),
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        };
        self.replies.unbounded_send(Ok(resp)).unwrap();
        let answer = self.next().await;
        assert_eq!(answer.response_nonce, nonce, "{answer:?}");
        assert_eq!(answer.type_url, type_url);
        answer
    }
}

async fn start_fake() -> (SocketAddr, fmpsc::UnboundedReceiver<FakeStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = fmpsc::unbounded();
    let svc = AggregatedDiscoveryServiceServer::new(FakeAds { streams: tx });
    tokio::spawn(async move {
        Server::builder()
            .add_service(svc)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    (addr, rx)
}

async fn next_stream(streams: &mut fmpsc::UnboundedReceiver<FakeStream>) -> FakeStream {
    tokio::time::timeout(Duration::from_secs(10), streams.next())
        .await
        .expect("the client (re)connects within 10 s")
        .unwrap()
}

fn workload(uid: &str, addr: Vec<u8>) -> wpb::Workload {
    wpb::Workload {
        uid: uid.into(),
        name: uid.rsplit('/').next().unwrap().into(),
        namespace: "default".into(),
        addresses: vec![addr],
        tunnel_protocol: wpb::TunnelProtocol::Hbone as i32,
        ..Default::default()
    }
}

fn address(name: &str, version: &str, w: wpb::Workload) -> Resource {
    let msg = wpb::Address {
        r#type: Some(wpb::address::Type::Workload(w)),
    };
    raw(name, version, ADDRESS_TYPE_URL, msg.encode_to_vec())
}

fn policy(name: &str, version: &str, action: i32) -> Resource {
    let msg = spb::Authorization {
        name: name.into(),
        namespace: "default".into(),
        scope: spb::Scope::Namespace as i32,
        action,
        ..Default::default()
    };
    raw(
        &format!("default/{name}"),
        version,
        AUTHORIZATION_TYPE_URL,
        msg.encode_to_vec(),
    )
}

fn raw(name: &str, version: &str, type_url: &str, value: Vec<u8>) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        resource: Some(prost_types::Any {
            type_url: type_url.into(),
            value,
        }),
        ..Default::default()
    }
}

fn versions(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

fn has_ip(store: &StateStore, ip: &str) -> Option<String> {
    store
        .snapshot()
        .workload_by_ip(ip.parse().unwrap())
        .map(|w| w.uid.clone())
}

#[tokio::test]
async fn nacks_bad_resources_keeps_old_state_and_resyncs_after_disconnects() {
    let (addr, mut streams) = start_fake().await;
    let metrics = XdsMetrics::default();
    let client = XdsClient::new(test_config(format!("http://{addr}")))
        .unwrap()
        .with_metrics(metrics.clone());
    let status = client.status();
    let store = Arc::new(StateStore::default());
    let task = tokio::spawn(client.run(store.clone()));

    // Subscriptions: wildcard, with the node, nothing known yet.
    let mut s = next_stream(&mut streams).await;
    let subs = s.subscriptions().await;
    for t in [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL] {
        let r = &subs[t];
        assert!(r.resource_names_subscribe.is_empty() && r.initial_resource_versions.is_empty());
        assert!(r.node.as_ref().unwrap().id.starts_with("ztunnel~"), "{r:?}");
    }

    let ack = s
        .push(
            ADDRESS_TYPE_URL,
            "n1",
            vec![
                address("c//a", "v1", workload("c//a", vec![10, 0, 0, 1])),
                address("c//b", "v1", workload("c//b", vec![10, 0, 0, 2])),
            ],
            &[],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let ack = s
        .push(
            AUTHORIZATION_TYPE_URL,
            "p1",
            vec![policy("p", "v1", 1)],
            &[],
        )
        .await;
    assert!(ack.error_detail.is_none());
    eventually("synced", || status.borrow().synced).await;
    assert_eq!(has_ip(&store, "10.0.0.1").as_deref(), Some("c//a"));
    assert_eq!(has_ip(&store, "10.0.0.2").as_deref(), Some("c//b"));

    // Garbage among good news: bad IP bytes for a, undecodable d, a policy posing as an
    // address; c is fine and must be applied anyway.
    let nack = s
        .push(
            ADDRESS_TYPE_URL,
            "n2",
            vec![
                address("c//a", "v2", workload("c//a", vec![1, 2, 3])),
                address("c//c", "v1", workload("c//c", vec![10, 0, 0, 3])),
                raw("c//d", "v1", ADDRESS_TYPE_URL, vec![0xff, 0xff, 0xff]),
                policy("e", "v1", 0),
            ],
            &[],
        )
        .await;
    let detail = nack.error_detail.expect("NACK");
    assert_eq!(detail.code, 3);
    let msg = detail.message;
    assert!(msg.starts_with("rejected 3 resource(s)"), "{msg}");
    assert!(
        msg.contains("c//a: workload.addresses[0]: 3 bytes is not an IP address"),
        "{msg}"
    );
    assert!(msg.contains("c//d: cannot decode the protobuf"), "{msg}");
    assert!(
        msg.contains("default/e: expected a type.googleapis.com/istio.workload.Address"),
        "{msg}"
    );
    assert_eq!(
        has_ip(&store, "10.0.0.1").as_deref(),
        Some("c//a"),
        "old a kept"
    );
    assert_eq!(
        has_ip(&store, "10.0.0.3").as_deref(),
        Some("c//c"),
        "good c applied"
    );
    {
        let st = status.borrow();
        let n = st.last_nack.as_ref().unwrap();
        assert_eq!(
            (n.type_url.as_str(), n.nonce.as_str()),
            (ADDRESS_TYPE_URL, "n2")
        );
        assert_eq!(st.types[ADDRESS_TYPE_URL].last_ack_nonce, "n1");
        assert_eq!(st.types[ADDRESS_TYPE_URL].nacks, 1);
    }

    // An enum value this build does not know: NACK, the old policy stays.
    let nack = s
        .push(
            AUTHORIZATION_TYPE_URL,
            "p2",
            vec![policy("p", "v2", 7)],
            &[],
        )
        .await;
    assert!(nack
        .error_detail
        .unwrap()
        .message
        .contains("action: unknown enum value 7"));
    let p = store.snapshot().policies.get("default/p").cloned().unwrap();
    assert_eq!(p.action, crate::policy::Action::Deny);

    // A type nobody subscribed to.
    let nack = s
        .push(
            "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "x1",
            vec![],
            &[],
        )
        .await;
    assert!(nack
        .error_detail
        .unwrap()
        .message
        .contains("not subscribed"));

    // Removals, including one of a name never sent.
    let ack = s
        .push(ADDRESS_TYPE_URL, "n3", vec![], &["c//b", "c//never"])
        .await;
    assert!(ack.error_detail.is_none());
    assert_eq!(has_ip(&store, "10.0.0.2"), None);

    // The server ends the stream: the client comes back and says what it holds (a at the
    // version it accepted, not the rejected one).
    drop(s);
    let mut s = next_stream(&mut streams).await;
    let subs = s.subscriptions().await;
    assert_eq!(
        subs[ADDRESS_TYPE_URL].initial_resource_versions,
        versions(&[("c//a", "v1"), ("c//c", "v1")])
    );
    assert_eq!(
        subs[AUTHORIZATION_TYPE_URL].initial_resource_versions,
        versions(&[("default/p", "v1")])
    );
    assert_eq!(
        has_ip(&store, "10.0.0.1").as_deref(),
        Some("c//a"),
        "kept while away"
    );
    let ack = s.push(ADDRESS_TYPE_URL, "m1", vec![], &["c//c"]).await;
    assert!(ack.error_detail.is_none());
    assert_eq!(has_ip(&store, "10.0.0.3"), None);

    // The stream fails with an error status: same again.
    s.replies
        .unbounded_send(Err(Status::unavailable("going away")))
        .unwrap();
    let mut s = next_stream(&mut streams).await;
    let subs = s.subscriptions().await;
    assert_eq!(
        subs[ADDRESS_TYPE_URL].initial_resource_versions,
        versions(&[("c//a", "v1")])
    );
    eventually("third stream open", || {
        let st = status.borrow();
        st.connected && st.connections == 3 && st.last_error.is_none()
    })
    .await;
    assert!(store.snapshot().policies.get("default/p").is_some());
    drop(s);
    task.abort();

    // istio_xds_*: the clean end and the failed stream, each response by type.
    let ended = |reason| {
        let l = crate::metrics::xds::TerminationLabels { reason };
        metrics.terminations.get_or_create(&l).get()
    };
    assert_eq!(ended(Termination::Complete), 1);
    assert_eq!(
        ended(Termination::Error),
        1,
        "unavailable, not closing: an error"
    );
    assert_eq!(ended(Termination::Reconnect), 0);
    let by_url = |f: &prometheus_client::metrics::family::Family<_, _>, url: &str| {
        let l = crate::metrics::xds::TypeUrlLabels { url: url.into() };
        let c: &prometheus_client::metrics::counter::Counter = &f.get_or_create(&l);
        c.get()
    };
    assert_eq!(by_url(&metrics.messages, ADDRESS_TYPE_URL), 4);
    assert_eq!(by_url(&metrics.messages, AUTHORIZATION_TYPE_URL), 2);
    let cluster = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    assert_eq!(by_url(&metrics.messages, cluster), 1);
    assert_eq!(by_url(&metrics.message_bytes, cluster), 0);
    let policy_bytes = policy("p", "v1", 1).resource.unwrap().value.len()
        + policy("p", "v2", 7).resource.unwrap().value.len();
    assert_eq!(
        by_url(&metrics.message_bytes, AUTHORIZATION_TYPE_URL),
        policy_bytes as u64
    );
}

/// A workload resource whose uid changes under the same name replaces, not duplicates.
#[tokio::test]
async fn a_name_that_changes_meaning_drops_the_old_resource() {
    let (addr, mut streams) = start_fake().await;
    let client = XdsClient::new(test_config(format!("http://{addr}"))).unwrap();
    let store = Arc::new(StateStore::default());
    let task = tokio::spawn(client.run(store.clone()));
    let mut s = next_stream(&mut streams).await;
    s.subscriptions().await;
    s.push(
        ADDRESS_TYPE_URL,
        "1",
        vec![address("x", "v1", workload("c//old", vec![10, 0, 0, 1]))],
        &[],
    )
    .await;
    s.push(
        ADDRESS_TYPE_URL,
        "2",
        vec![address("x", "v2", workload("c//new", vec![10, 0, 0, 2]))],
        &[],
    )
    .await;
    let snap = store.snapshot();
    assert!(snap.workload_by_uid("c//old").is_none());
    assert!(snap.workload_by_uid("c//new").is_some());
    assert_eq!(snap.workloads().count(), 1);
    s.push(ADDRESS_TYPE_URL, "3", vec![], &["x"]).await;
    assert_eq!(store.snapshot().workloads().count(), 0);
    task.abort();
}
