//! The xDS server seen by a raw ADS client over loopback gRPC: what each response carries.

use std::path::PathBuf;
use std::time::Duration;

use futures::channel::mpsc as fmpsc;
use tokio::net::TcpListener;
use tonic::codec::Streaming;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use super::*;
use crate::controlplane::tokens::watch_tokens;
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;

const FILE: &str = "\
workloads:
- {uid: c//Pod/default/a, name: a, namespace: default, workloadIps: [10.0.0.1]}
- {uid: c//Pod/default/b, name: b, namespace: default, workloadIps: [10.0.0.2]}
services:
- {name: s, namespace: default, hostname: s.default.svc.cluster.local, vips: [/10.96.0.1]}
policies:
- {name: p, namespace: default, scope: Namespace}
";

struct Fixture {
    dir: PathBuf,
    addr: std::net::SocketAddr,
}

impl Fixture {
    async fn new(name: &str) -> Fixture {
        Self::with_limits(name, ControlplaneLimits::default()).await
    }

    async fn with_limits(name: &str, limits: ControlplaneLimits) -> Fixture {
        let dir = std::env::temp_dir().join(format!(
            "ztunnel-xdss-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("w.yaml"), FILE).unwrap();
        std::fs::write(
            dir.join("tokens"),
            "tok-a node-a\ntok-wp spiffe://cluster.local/ns/default/sa/waypoint\n",
        )
        .unwrap();
        let interval = Duration::from_millis(20);
        let config = crate::xds::watch_every(dir.join("w.yaml"), interval).unwrap();
        let tokens = watch_tokens(&dir.join("tokens"), "cluster.local", interval).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = XdsService::with_limits(tokens, config, &limits).into_server(&limits);
        tokio::spawn(async move {
            Server::builder()
                .add_service(svc)
                .serve_with_incoming(TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        Fixture { dir, addr }
    }

    /// Opens a stream with `token`, subscribing to Address with `known` versions.
    async fn subscribe(
        &self,
        token: Option<&str>,
        known: HashMap<String, String>,
    ) -> Result<
        (
            fmpsc::UnboundedSender<DeltaDiscoveryRequest>,
            Streaming<DeltaDiscoveryResponse>,
        ),
        Status,
    > {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap();
        let (tx, rx) = fmpsc::unbounded();
        tx.unbounded_send(DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            initial_resource_versions: known,
            ..Default::default()
        })
        .unwrap();
        let mut req = Request::new(rx);
        if let Some(t) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        let stream = client.delta_aggregated_resources(req).await?.into_inner();
        Ok((tx, stream))
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

async fn next(
    stream: &mut Streaming<DeltaDiscoveryResponse>,
) -> Result<DeltaDiscoveryResponse, Status> {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a response within 10 s")
        .map(|r| r.expect("stream open"))
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut v: Vec<String> = r.resources.iter().map(|r| r.name.clone()).collect();
    v.sort();
    v
}

fn versions_of(r: &DeltaDiscoveryResponse) -> HashMap<String, String> {
    r.resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect()
}

#[tokio::test]
async fn initial_push_then_only_changes_and_removals() {
    let f = Fixture::new("diff").await;
    let (_tx, mut stream) = f.subscribe(Some("tok-a"), HashMap::new()).await.unwrap();
    let first = next(&mut stream).await.unwrap();
    assert_eq!(first.type_url, ADDRESS_TYPE_URL);
    assert_eq!(
        names(&first),
        [
            "c//Pod/default/a",
            "c//Pod/default/b",
            "default/s.default.svc.cluster.local"
        ]
    );
    assert!(first.removed_resources.is_empty() && !first.nonce.is_empty());
    let v1 = versions_of(&first);

    // Edit: a changes, b goes, c arrives; s and the policy are untouched.
    // Renamed into place: the watcher must not see a half-written file.
    std::fs::write(
        f.dir.join("w.tmp"),
        FILE.replace("10.0.0.1", "10.0.0.9").replace(
            "- {uid: c//Pod/default/b, name: b",
            "- {uid: c//Pod/default/c, name: c",
        ),
    )
    .unwrap();
    std::fs::rename(f.dir.join("w.tmp"), f.dir.join("w.yaml")).unwrap();
    let push = next(&mut stream).await.unwrap();
    assert_eq!(names(&push), ["c//Pod/default/a", "c//Pod/default/c"]);
    assert_eq!(push.removed_resources, ["c//Pod/default/b"]);
    assert_ne!(push.nonce, first.nonce);
    assert_ne!(
        versions_of(&push)["c//Pod/default/a"],
        v1["c//Pod/default/a"]
    );

    // A reconnecting client that has all but a stale a and a gone name gets just those.
    let mut known = v1.clone();
    known.insert("c//Pod/default/gone".into(), "x".into());
    known.remove("c//Pod/default/b");
    known.insert(
        "c//Pod/default/c".into(),
        versions_of(&push)["c//Pod/default/c"].clone(),
    );
    let (_tx2, mut stream2) = f.subscribe(Some("tok-a"), known).await.unwrap();
    let resync = next(&mut stream2).await.unwrap();
    assert_eq!(names(&resync), ["c//Pod/default/a"]);
    assert_eq!(resync.removed_resources, ["c//Pod/default/gone"]);

    // Up to date: still answered (so the client knows it is in sync), with nothing in it.
    let current: HashMap<String, String> = versions_of(&first)
        .into_iter()
        .filter(|(n, _)| n.starts_with("default/"))
        .chain(versions_of(&push))
        .collect();
    let (_tx3, mut stream3) = f.subscribe(Some("tok-a"), current).await.unwrap();
    let empty = next(&mut stream3).await.unwrap();
    assert!(
        empty.resources.is_empty() && empty.removed_resources.is_empty(),
        "{empty:?}"
    );
}

#[tokio::test]
async fn callers_need_a_known_token_and_lose_the_stream_when_it_is_revoked() {
    let f = Fixture::new("auth").await;
    let e = f.subscribe(None, HashMap::new()).await.err().unwrap();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = f
        .subscribe(Some("wrong"), HashMap::new())
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    let (_tx, mut stream) = f.subscribe(Some("tok-a"), HashMap::new()).await.unwrap();
    next(&mut stream).await.unwrap();
    std::fs::write(f.dir.join("tokens.tmp"), "tok-b node-a\n").unwrap();
    std::fs::rename(f.dir.join("tokens.tmp"), f.dir.join("tokens")).unwrap();
    let e = next(&mut stream).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("revoked"), "{e:?}");
}

/// A waypoint's (identity) token reads the same resources a node's does, and loses its
/// stream when the token is given to another caller.
#[tokio::test]
async fn identity_tokens_read_everything_until_reassigned() {
    let f = Fixture::new("identity").await;
    let (_tx, mut node) = f.subscribe(Some("tok-a"), HashMap::new()).await.unwrap();
    let (_tx2, mut waypoint) = f.subscribe(Some("tok-wp"), HashMap::new()).await.unwrap();
    let for_node = next(&mut node).await.unwrap();
    let for_waypoint = next(&mut waypoint).await.unwrap();
    assert_eq!(names(&for_waypoint), names(&for_node));
    assert_eq!(names(&for_waypoint).len(), 3, "{for_waypoint:?}");

    std::fs::write(
        f.dir.join("tokens.tmp"),
        "tok-a node-a\ntok-wp spiffe://cluster.local/ns/default/sa/gateway\n",
    )
    .unwrap();
    std::fs::rename(f.dir.join("tokens.tmp"), f.dir.join("tokens")).unwrap();
    let e = next(&mut waypoint).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("revoked"), "{e:?}");
}

#[test]
fn snapshot_names_and_versions_are_content_based() {
    let cfg = LocalConfig::from_yaml(FILE).unwrap();
    let a = Snapshot::of(&cfg);
    let b = Snapshot::of(&cfg);
    let names: Vec<_> = a
        .resources(AUTHORIZATION_TYPE_URL)
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(names, ["default/p"]);
    assert_eq!(
        a.type_version(ADDRESS_TYPE_URL),
        b.type_version(ADDRESS_TYPE_URL)
    );
    let changed = LocalConfig::from_yaml(&FILE.replace("10.0.0.2", "10.0.0.3")).unwrap();
    let c = Snapshot::of(&changed);
    assert_ne!(
        a.type_version(ADDRESS_TYPE_URL),
        c.type_version(ADDRESS_TYPE_URL)
    );
    assert_eq!(
        a.type_version(AUTHORIZATION_TYPE_URL),
        c.type_version(AUTHORIZATION_TYPE_URL)
    );
}

/// What `ztunnel controlplane` runs: CA and xDS on one TLS port; a node proxy's xDS client
/// syncs from it with the CA root and its token.
#[tokio::test]
async fn served_next_to_the_ca_over_tls() {
    use crate::identity::ca::{CaOptions, CertificateAuthority};
    use crate::xds::client::{XdsClient, XdsConfig};

    let f = Fixture::new("tls").await;
    let ca = Arc::new(CertificateAuthority::new(CaOptions::new("cluster.local")).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cert = ca
        .issue_server_cert(&[addr.ip()], &[], Duration::from_secs(3600))
        .unwrap();
    let interval = Duration::from_millis(20);
    let config = crate::xds::watch_every(f.dir.join("w.yaml"), interval).unwrap();
    let tokens = watch_tokens(&f.dir.join("tokens"), "cluster.local", interval).unwrap();
    let xds = XdsService::new(tokens.clone(), config.clone());
    let ca_service = super::super::CaService::new(ca.clone(), tokens, config);
    let server = super::super::serve_with_xds(ca_service, Some(xds), listener, &cert).unwrap();

    std::fs::write(f.dir.join("root.pem"), ca.root_cert_pem()).unwrap();
    std::fs::write(f.dir.join("token"), "tok-a\n").unwrap();
    let mut cfg = XdsConfig::new(format!("https://{addr}"), "node-a");
    cfg.root_cert = Some(f.dir.join("root.pem"));
    cfg.token_file = Some(f.dir.join("token"));
    let client = XdsClient::new(cfg).unwrap();
    let mut status = client.status();
    let store = Arc::new(crate::state::StateStore::default());
    let task = tokio::spawn(client.run(store.clone()));
    tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| s.synced))
        .await
        .expect("synced within 10 s")
        .unwrap();
    let snap = store.snapshot();
    assert_eq!(snap.workloads().count(), 2);
    assert_eq!(snap.services().count(), 1);
    assert!(snap.policies.get("default/p").is_some());
    task.abort();
    server.shutdown().await.unwrap();
}

/// One token holds at most so many streams at once; another token is not affected, and a
/// stream that ends gives its place back.
#[tokio::test]
async fn streams_per_token_are_capped() {
    let limits = ControlplaneLimits {
        max_xds_streams_per_token: 2,
        ..ControlplaneLimits::default()
    };
    let f = Fixture::with_limits("per-token", limits).await;
    let (tx1, mut s1) = f.subscribe(Some("tok-a"), HashMap::new()).await.unwrap();
    let (_tx2, mut s2) = f.subscribe(Some("tok-a"), HashMap::new()).await.unwrap();
    next(&mut s1).await.unwrap();
    next(&mut s2).await.unwrap();
    let before = crate::limits::hits("xds_streams_per_token");
    let third = f.subscribe(Some("tok-a"), HashMap::new()).await;
    assert_eq!(
        third.err().map(|s| s.code()),
        Some(tonic::Code::ResourceExhausted)
    );
    assert!(crate::limits::hits("xds_streams_per_token") > before);
    let (_tx, mut other) = f.subscribe(Some("tok-wp"), HashMap::new()).await.unwrap();
    next(&mut other).await.unwrap();
    // The client ends a stream: its place comes back once the server has seen it go.
    drop(tx1);
    while s1.message().await.is_ok_and(|m| m.is_some()) {}
    loop {
        match f.subscribe(Some("tok-a"), HashMap::new()).await {
            Ok((_tx, mut s)) => {
                next(&mut s).await.unwrap();
                break;
            }
            Err(s) => assert_eq!(s.code(), tonic::Code::ResourceExhausted),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a client says it holds is bounded: past the limit its stream ends; within it,
/// names the server never had are answered as removed once, and not kept.
#[tokio::test]
async fn initial_resource_versions_are_bounded() {
    let limits = ControlplaneLimits {
        max_initial_resources: 10,
        ..ControlplaneLimits::default()
    };
    let f = Fixture::with_limits("initial", limits).await;
    let unknown = |n: usize| -> HashMap<String, String> {
        (0..n)
            .map(|i| (format!("junk-{i}"), "v".to_string()))
            .collect()
    };
    let before = crate::limits::hits("xds_initial_resources");
    let (_tx, mut s) = f.subscribe(Some("tok-a"), unknown(11)).await.unwrap();
    let refused = next(&mut s).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(crate::limits::hits("xds_initial_resources") > before);

    let (tx, mut s) = f.subscribe(Some("tok-a"), unknown(10)).await.unwrap();
    let first = next(&mut s).await.unwrap();
    let mut removed = first.removed_resources.clone();
    removed.sort();
    let mut want: Vec<String> = unknown(10).into_keys().collect();
    want.sort();
    assert_eq!(removed, want, "unknown names: removed, once");
    assert_eq!(names(&first).len(), 3);
    // A resubscription on the same stream knows nothing of them any more.
    tx.unbounded_send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.into(),
        initial_resource_versions: versions_of(&first),
        ..Default::default()
    })
    .unwrap();
    let again = next(&mut s).await.unwrap();
    assert!(again.removed_resources.is_empty() && again.resources.is_empty());
}
