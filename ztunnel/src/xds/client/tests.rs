//! Real gRPC over loopback: the client against the control plane's xDS server, with the
//! workload file edited while connected, TLS + tokens, and connections cut in between.
//! (The misbehaving-server tests are in `tests_fake.rs`.)

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};

use super::*;
use crate::controlplane::tokens::watch_tokens;
use crate::controlplane::xds_server::XdsService;
use crate::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use crate::state::NamespacedHostname;

const V1: &str = "\
workloads:
- uid: c//Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: [10.0.1.5]
  protocol: HBONE
  node: node-a
  services:
    default/echo.default.svc.cluster.local: {80: 8080}
- uid: c//Pod/default/echo
  name: echo
  namespace: default
  workloadIps: [10.0.2.5]
  protocol: HBONE
  node: node-b
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: [/10.96.0.10]
policies:
- name: allow-sleep
  namespace: default
  scope: Namespace
  rules: [[[principals: [cluster.local/ns/default/sa/sleep]]]]
";

/// V1 with: sleep moved to a new IP, echo removed, a new workload, the service and the
/// policy removed, a new DENY policy.
const V2: &str = "\
workloads:
- uid: c//Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: [10.0.1.6]
  protocol: HBONE
  node: node-a
- uid: c//Pod/default/new
  name: new
  namespace: default
  workloadIps: [10.0.3.5]
policies:
- name: deny-all
  namespace: default
  scope: Namespace
  action: Deny
  rules: [[]]
";

pub(super) const FAST: Duration = Duration::from_millis(20);

pub(super) fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ztunnel-xds-{name}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Polls `cond` until it holds; panics with `what` after 10 s.
pub(super) async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub(super) fn test_config(address: String) -> XdsConfig {
    let mut c = XdsConfig::new(address, "node-a");
    c.backoff_initial = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(200);
    c.connect_timeout = Duration::from_secs(2);
    c
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The control plane's xDS service on loopback, with its files.
struct ControlPlane {
    dir: PathBuf,
    addr: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl ControlPlane {
    async fn start(name: &str, tls: Option<&crate::identity::ca::ServerCertPem>) -> ControlPlane {
        let dir = temp_dir(name);
        std::fs::write(dir.join("workloads.yaml"), V1).unwrap();
        std::fs::write(dir.join("tokens"), "tok-a node-a\n").unwrap();
        std::fs::write(dir.join("token-a"), "tok-a\n").unwrap();
        let mut cp = ControlPlane {
            dir,
            addr: "127.0.0.1:0".parse().unwrap(),
            task: None,
        };
        cp.serve(tls).await;
        cp
    }

    async fn serve(&mut self, tls: Option<&crate::identity::ca::ServerCertPem>) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.addr = listener.local_addr().unwrap();
        let config = crate::xds::watch_every(self.dir.join("workloads.yaml"), FAST).unwrap();
        let tokens = watch_tokens(&self.dir.join("tokens"), "cluster.local", FAST).unwrap();
        let mut builder = Server::builder();
        if let Some(cert) = tls {
            let id = tonic::transport::Identity::from_pem(cert.chain.concat(), &cert.key);
            builder = builder
                .tls_config(ServerTlsConfig::new().identity(id))
                .unwrap();
        }
        let router = builder.add_service(
            XdsService::new(tokens, config)
                .into_server(&crate::config::ControlplaneLimits::default()),
        );
        self.task = Some(tokio::spawn(async move {
            router
                .serve_with_incoming(TcpIncoming::from(listener))
                .await
                .unwrap();
        }));
    }

    /// Renamed into place, so the watcher never sees a half-written file.
    fn edit(&self, yaml: &str) {
        std::fs::write(self.dir.join("workloads.tmp"), yaml).unwrap();
        std::fs::rename(
            self.dir.join("workloads.tmp"),
            self.dir.join("workloads.yaml"),
        )
        .unwrap();
    }

    fn client_config(&self, address: String) -> XdsConfig {
        let mut c = test_config(address);
        c.token_file = Some(self.dir.join("token-a"));
        c
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

fn spawn_client(
    config: XdsConfig,
) -> (Arc<StateStore>, watch::Receiver<XdsStatus>, JoinHandle<()>) {
    let client = XdsClient::new(config).unwrap();
    let status = client.status();
    let store = Arc::new(StateStore::default());
    let task = tokio::spawn(client.run(store.clone()));
    (store, status, task)
}

fn echo_key() -> NamespacedHostname {
    NamespacedHostname::new("default", "echo.default.svc.cluster.local")
}

fn assert_v1(store: &StateStore) {
    let s = store.snapshot();
    let sleep = s.workload_by_ip(ip("10.0.1.5")).expect("sleep");
    assert_eq!(sleep.service_account, "sleep");
    assert!(s.workload_by_ip(ip("10.0.2.5")).is_some(), "echo");
    assert_eq!(s.endpoints(&echo_key()).len(), 1);
    assert!(s.service(&echo_key()).is_some());
    assert!(s.policies.get("default/allow-sleep").is_some());
}

fn is_v2(store: &StateStore) -> bool {
    let s = store.snapshot();
    s.workload_by_ip(ip("10.0.1.6")).is_some()
        && s.workload_by_ip(ip("10.0.1.5")).is_none()
        && s.workload_by_ip(ip("10.0.2.5")).is_none()
        && s.workload_by_ip(ip("10.0.3.5")).is_some()
        && s.service(&echo_key()).is_none()
        && s.policies.get("default/allow-sleep").is_none()
        && s.policies.get("default/deny-all").is_some()
        && s.workloads().count() == 2
        && s.policies.len() == 1
}

#[tokio::test]
async fn syncs_and_follows_workload_file_edits() {
    let cp = ControlPlane::start("edits", None).await;
    let (store, status, task) = spawn_client(cp.client_config(format!("http://{}", cp.addr)));
    eventually("initial sync", || status.borrow().synced).await;
    assert_v1(&store);
    {
        let st = status.borrow();
        assert!(st.connected && st.connections == 1, "{st:?}");
        assert_eq!(st.types[ADDRESS_TYPE_URL].resources, 3);
        assert_eq!(st.types[AUTHORIZATION_TYPE_URL].resources, 1);
        assert!(st.last_nack.is_none());
        assert!(!st.types[ADDRESS_TYPE_URL].last_ack_version.is_empty());
    }

    cp.edit(V2);
    eventually("v2 applied", || is_v2(&store)).await;
    // The sleep workload kept its identity through the update.
    let sleep = store.snapshot().workload_by_ip(ip("10.0.1.6")).unwrap();
    assert_eq!(sleep.uid, "c//Pod/default/sleep");
    assert_eq!(sleep.service_account, "sleep");

    cp.edit(V1);
    eventually("back to v1", || {
        let s = store.snapshot();
        s.workload_by_ip(ip("10.0.2.5")).is_some() && s.policies.len() == 1
    })
    .await;
    assert_v1(&store);
    assert_eq!(store.snapshot().workloads().count(), 2);
    let st = status.borrow().clone();
    assert_eq!(st.connections, 1, "edits are pushed on the same stream");
    assert!(st.types[ADDRESS_TYPE_URL].acks >= 3, "{st:?}");
    task.abort();
}

/// A loopback TCP relay whose connections can be cut at once (an abrupt disconnect, as
/// when a node or istiod dies) and which can refuse service for a while.
struct Relay {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    task: JoinHandle<()>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (up2, conns2) = (up.clone(), conns.clone());
        let task = tokio::spawn(async move {
            loop {
                let (mut client, _) = listener.accept().await.unwrap();
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is reset
                }
                let conn = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                conns2.lock().unwrap().push(conn);
            }
        });
        Relay {
            addr,
            up,
            conns,
            task,
        }
    }

    /// Cuts every connection and refuses new ones.
    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

#[tokio::test]
async fn keeps_state_while_cut_off_and_resyncs_on_reconnect() {
    let cp = ControlPlane::start("cut", None).await;
    let relay = Relay::start(cp.addr).await;
    let (store, status, task) = spawn_client(cp.client_config(format!("http://{}", relay.addr)));
    eventually("initial sync", || status.borrow().synced).await;
    assert_v1(&store);

    relay.cut();
    eventually("disconnect noticed", || !status.borrow().connected).await;
    cp.edit(V2);
    // Several failed reconnects while the control plane is unreachable: state unchanged.
    eventually("reconnects attempted", || {
        status.borrow().last_error.is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_v1(&store);
    assert!(!status.borrow().connected);

    relay.restore();
    eventually("resynced to v2 after reconnect", || is_v2(&store)).await;
    let st = status.borrow().clone();
    assert!(st.connected && st.connections >= 2, "{st:?}");
    assert_eq!(st.types[ADDRESS_TYPE_URL].resources, 2);
    assert_eq!(st.types[AUTHORIZATION_TYPE_URL].resources, 1);
    task.abort();
}

#[tokio::test]
async fn tls_with_root_file_and_token() {
    let mut opts = crate::identity::ca::CaOptions::new("cluster.local");
    opts.dir = None;
    let ca = crate::identity::ca::CertificateAuthority::new(opts).unwrap();
    let cert = ca
        .issue_server_cert(
            &[ip("127.0.0.1")],
            &["localhost".to_string()],
            Duration::from_secs(3600),
        )
        .unwrap();
    let cp = ControlPlane::start("tls", Some(&cert)).await;
    let root = cp.dir.join("root.pem");
    std::fs::write(&root, ca.root_cert_pem()).unwrap();

    // https without a root is refused up front.
    let no_root = cp.client_config(format!("https://localhost:{}", cp.addr.port()));
    let err = XdsClient::new(no_root).err().expect("needs a root");
    assert!(err.to_string().contains("root certificate"), "{err}");

    let mut good = cp.client_config(format!("https://localhost:{}", cp.addr.port()));
    good.root_cert = Some(root.clone());
    let (store, status, task) = spawn_client(good.clone());
    eventually("sync over TLS", || status.borrow().synced).await;
    assert_v1(&store);
    task.abort();

    // A token the control plane does not know: refused, and said so.
    let bad_token = cp.dir.join("token-x");
    std::fs::write(&bad_token, "nope\n").unwrap();
    let mut bad = good.clone();
    bad.token_file = Some(bad_token);
    let (_store, status, task) = spawn_client(bad);
    eventually("refusal reported", || status.borrow().last_error.is_some()).await;
    let st = status.borrow().clone();
    assert!(!st.connected && !st.synced);
    let e = st.last_error.unwrap();
    assert!(e.contains("Unauthenticated"), "{e}");
    task.abort();

    // A root that did not sign the server's certificate: a TLS failure, not a hang.
    let other = crate::identity::ca::CertificateAuthority::new(
        crate::identity::ca::CaOptions::new("cluster.local"),
    )
    .unwrap();
    let wrong_root = cp.dir.join("wrong.pem");
    std::fs::write(&wrong_root, other.root_cert_pem()).unwrap();
    let mut wrong = good;
    wrong.root_cert = Some(wrong_root);
    let (_store, status, task) = spawn_client(wrong);
    eventually("TLS failure reported", || {
        status.borrow().last_error.is_some()
    })
    .await;
    assert!(!status.borrow().connected);
    task.abort();
}

#[test]
fn node_identifies_as_ztunnel_with_istiod_metadata() {
    let mut c = XdsConfig::new("https://istiod.istio-system.svc:15012", "node-a");
    c.pod_name = "ztunnel-x1".into();
    c.pod_namespace = "istio-system".into();
    c.instance_ips = vec![ip("10.0.0.7"), ip("fd00::7")];
    c.metadata.insert("FOO".into(), "bar".into());
    let node = c.node();
    assert_eq!(
        node.id,
        "ztunnel~10.0.0.7~ztunnel-x1.istio-system~istio-system.svc.cluster.local"
    );
    let md = node.metadata.unwrap().fields;
    let get = |k: &str| match md.get(k).and_then(|v| v.kind.clone()) {
        Some(Kind::StringValue(s)) => s,
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(get("NAME"), "ztunnel-x1");
    assert_eq!(get("NAMESPACE"), "istio-system");
    assert_eq!(get("NODE_NAME"), "node-a");
    assert_eq!(get("CLUSTER_ID"), "Kubernetes");
    assert_eq!(get("INSTANCE_IPS"), "10.0.0.7,fd00::7");
    assert_eq!(get("FOO"), "bar");
    assert!(XdsClient::new(XdsConfig::new("istiod:15012", "n")).is_err());
    assert!(XdsClient::new(XdsConfig::new("http://127.0.0.1:1", "n")).is_ok());
}

#[tokio::test]
async fn spawn_for_run_reads_the_run_flags() {
    use clap::Parser;
    let run = |extra: &[&str]| {
        let mut argv = vec!["ztunnel", "run", "--node-name", "node-a"];
        argv.extend(extra);
        match crate::config::Cli::try_parse_from(argv).unwrap().command {
            crate::config::Command::Run(a) => a,
            _ => unreachable!(),
        }
    };
    let store = Arc::new(StateStore::default());
    let metrics = XdsMetrics::default();
    assert!(spawn_for_run(&run(&[]), store.clone(), &metrics)
        .unwrap()
        .is_none());
    let err = spawn_for_run(
        &run(&["--xds-address", "https://istiod:15012"]),
        store.clone(),
        &metrics,
    )
    .err()
    .unwrap();
    assert!(format!("{err:#}").contains("root certificate"), "{err:#}");
    // The CA's root is the default root for xDS.
    let args = run(&[
        "--xds-address",
        "https://istiod:15012",
        "--ca-root-cert",
        "/nonexistent/root.pem",
    ]);
    let (task, status) = spawn_for_run(&args, store, &metrics).unwrap().unwrap();
    eventually("first attempt reported", || {
        status.borrow().last_error.is_some()
    })
    .await;
    let e = status.borrow().last_error.clone().unwrap();
    assert!(e.contains("/nonexistent/root.pem"), "{e}");
    task.abort();
}

/// Which failed streams count as a reconnect in `istio_xds_connection_terminations`.
#[test]
fn ordinary_stream_ends_are_reconnects() {
    use tonic::{Code, Status};
    for s in [
        Status::new(Code::Unknown, "x"),
        Status::new(Code::Cancelled, "x"),
        Status::new(Code::DeadlineExceeded, "x"),
        Status::new(Code::Unavailable, "error: transport is closing"),
        Status::new(Code::Unavailable, "received prior goaway: code: NO_ERROR"),
    ] {
        assert_eq!(stream_failure(&s), Termination::Reconnect, "{s:?}");
    }
    for s in [
        Status::new(Code::Unavailable, "going away"),
        Status::new(Code::PermissionDenied, "x"),
        Status::new(Code::Internal, "x"),
    ] {
        assert_eq!(stream_failure(&s), Termination::Error, "{s:?}");
    }
}
