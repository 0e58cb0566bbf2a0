//! Real gRPC round trips over loopback TLS: `GrpcCaClient` against the control plane's CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, UnixTime};

use super::*;
use crate::identity::ca::CaOptions;
use crate::identity::cert::{identity_from_cert, parse_pem_certs};
use crate::identity::manager::{CaClientError, SecretManagerOptions};
use crate::identity::{csr, CaClient, GrpcCaClient, Identity, SecretManager, WorkloadCertificate};

const WORKLOADS: &str = "\
workloads:
- uid: c//Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: [10.0.1.5]
  protocol: HBONE
  node: node-a
- uid: c//Pod/default/echo
  name: echo
  namespace: default
  serviceAccount: echo
  workloadIps: [10.0.2.5]
  protocol: HBONE
  node: node-b
";

const MAX_TTL: Duration = Duration::from_secs(3600);
const RELOAD: Duration = Duration::from_millis(50);

struct Fixture {
    dir: PathBuf,
    ca: Arc<CertificateAuthority>,
    server: Option<RunningCaServer>,
    addr: SocketAddr,
}

impl Fixture {
    async fn new(name: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!(
            "ztunnel-cp-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("workloads.yaml"), WORKLOADS).unwrap();
        std::fs::write(
            dir.join("tokens"),
            "# test tokens\ntok-a node-a\n\ntok-b node-b\n\
             tok-wp spiffe://cluster.local/ns/default/sa/waypoint\n",
        )
        .unwrap();
        std::fs::write(dir.join("token-a"), "tok-a\n").unwrap();
        std::fs::write(dir.join("token-wp"), "tok-wp").unwrap();
        let mut opts = CaOptions::new("cluster.local");
        opts.dir = Some(dir.join("ca"));
        opts.max_ttl = MAX_TTL;
        let ca = Arc::new(CertificateAuthority::new(opts).unwrap());
        let mut f = Fixture {
            dir,
            ca,
            server: None,
            addr: "127.0.0.1:0".parse().unwrap(),
        };
        f.start().await;
        f
    }

    /// (Re)starts the server on `self.addr` (port 0 the first time, the same port after).
    async fn start(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.addr = listener.local_addr().unwrap();
        let cert = self
            .ca
            .issue_server_cert(
                &serving_ips(self.addr),
                &[ISTIOD_DNS_NAME.to_string()],
                MAX_TTL,
            )
            .unwrap();
        let workloads = crate::xds::watch_every(self.dir.join("workloads.yaml"), RELOAD).unwrap();
        let tokens =
            tokens::watch_tokens(&self.dir.join("tokens"), "cluster.local", RELOAD).unwrap();
        let service = CaService::new(self.ca.clone(), tokens, workloads);
        self.server = Some(serve(service, listener, &cert).unwrap());
    }

    async fn stop(&mut self) {
        self.server.take().unwrap().shutdown().await.unwrap();
    }

    fn root_path(&self) -> PathBuf {
        self.dir
            .join("ca")
            .join(crate::identity::ca::ROOT_CERT_FILE)
    }

    fn client(&self, token_file: &Path) -> GrpcCaClient {
        GrpcCaClient::new(
            &format!("https://{}", self.addr),
            self.root_path(),
            Some(token_file),
        )
        .unwrap()
    }

    /// A client that asks for its own identity (no `ImpersonatedIdentity`).
    fn own_client(&self, token_file: &Path) -> GrpcCaClient {
        self.client(token_file).for_own_identity()
    }

    fn token(&self, name: &str, token: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, token).unwrap();
        p
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "default", sa)
}

async fn sign(
    client: &GrpcCaClient,
    identity: &Identity,
    ttl: Duration,
) -> Result<Vec<String>, CaClientError> {
    let req = csr::generate(identity).unwrap();
    client.sign(req.csr_pem, identity, ttl).await
}

fn rejected(r: Result<Vec<String>, CaClientError>) -> String {
    match r {
        Err(CaClientError::Rejected(msg)) => msg,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// Verifies `leaf` up to `root` with webpki, as a TLS peer would.
fn verify_chain(leaf: &CertificateDer<'_>, root: &CertificateDer<'_>) {
    let anchor = webpki::anchor_from_trusted_cert(root).unwrap();
    let ee = webpki::EndEntityCert::try_from(leaf).unwrap();
    let algs = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    ee.verify_for_usage(
        algs,
        &[anchor],
        &[],
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .expect("leaf chains to the CA root");
}

#[tokio::test]
async fn signs_for_a_workload_of_the_calling_node() {
    let f = Fixture::new("ok").await;
    let client = f.client(&f.dir.join("token-a"));
    let chain = sign(&client, &id("sleep"), Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(chain.len(), 2);
    let leaf = parse_pem_certs(&chain[0]).unwrap().remove(0);
    assert_eq!(identity_from_cert(&leaf).unwrap(), id("sleep"));
    let root_file = std::fs::read_to_string(f.root_path()).unwrap();
    assert_eq!(
        chain[1], root_file,
        "the chain ends with the root in <ca-dir>/root-cert.pem"
    );
    let root = parse_pem_certs(&root_file).unwrap().remove(0);
    verify_chain(&leaf, &root);
}

#[tokio::test]
async fn refuses_another_nodes_workload() {
    let f = Fixture::new("other").await;
    let client = f.client(&f.dir.join("token-a"));
    let msg = rejected(sign(&client, &id("echo"), Duration::ZERO).await);
    assert!(msg.contains("PermissionDenied"), "{msg}");
    assert!(
        msg.contains("node node-a may not") && msg.contains("node-b"),
        "{msg}"
    );
    let msg = rejected(sign(&client, &id("nobody"), Duration::ZERO).await);
    assert!(
        msg.contains("PermissionDenied") && msg.contains("no workload"),
        "{msg}"
    );
}

#[tokio::test]
async fn refuses_bad_or_missing_tokens() {
    let f = Fixture::new("token").await;
    let bad = f.client(&f.token("token-bad", "tok-x"));
    let msg = rejected(sign(&bad, &id("sleep"), Duration::ZERO).await);
    assert!(
        msg.contains("Unauthenticated") && msg.contains("unknown bearer token"),
        "{msg}"
    );
    assert!(
        !msg.contains("tok-x"),
        "the token must not be echoed: {msg}"
    );

    let anonymous =
        GrpcCaClient::new(&format!("https://{}", f.addr), f.root_path(), None::<&Path>).unwrap();
    let msg = rejected(sign(&anonymous, &id("sleep"), Duration::ZERO).await);
    assert!(
        msg.contains("Unauthenticated") && msg.contains("missing"),
        "{msg}"
    );
}

#[tokio::test]
async fn rereads_the_token_file_at_each_request() {
    let f = Fixture::new("rotate").await;
    let path = f.token("token-rot", "tok-x");
    let client = f.client(&path);
    rejected(sign(&client, &id("sleep"), Duration::ZERO).await);
    std::fs::write(&path, "tok-a").unwrap();
    sign(&client, &id("sleep"), Duration::ZERO)
        .await
        .expect("the new token is used");
    // Now node-b's token: node-b's workload, not node-a's.
    std::fs::write(&path, "tok-b\n").unwrap();
    sign(&client, &id("echo"), Duration::ZERO).await.unwrap();
    rejected(sign(&client, &id("sleep"), Duration::ZERO).await);
}

#[tokio::test]
async fn follows_edits_of_the_workload_file() {
    let f = Fixture::new("moves").await;
    let client = f.client(&f.dir.join("token-a"));
    rejected(sign(&client, &id("echo"), Duration::ZERO).await);
    // echo moves to node-a.
    std::fs::write(
        f.dir.join("workloads.yaml"),
        WORKLOADS.replace("node: node-b", "node: node-a"),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sign(&client, &id("echo"), Duration::ZERO).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the edit was not picked up"
        );
        tokio::time::sleep(RELOAD).await;
    }
}

#[tokio::test]
async fn malformed_csr_is_an_invalid_argument() {
    let f = Fixture::new("csr").await;
    let client = f.client(&f.dir.join("token-a"));
    let msg = rejected(
        client
            .sign("not a csr".into(), &id("sleep"), Duration::ZERO)
            .await,
    );
    assert!(
        msg.contains("InvalidArgument") && msg.contains("malformed CSR"),
        "{msg}"
    );
    // A well-formed CSR for another identity than the one asked for.
    let other = csr::generate(&id("echo")).unwrap();
    let msg = rejected(
        client
            .sign(other.csr_pem, &id("sleep"), Duration::ZERO)
            .await,
    );
    assert!(
        msg.contains("InvalidArgument") && msg.contains("SAN"),
        "{msg}"
    );
}

#[tokio::test]
async fn caps_the_validity() {
    let f = Fixture::new("ttl").await;
    let client = f.client(&f.dir.join("token-a"));
    let identity = id("sleep");
    let req = csr::generate(&identity).unwrap();
    let chain = client
        .sign(req.csr_pem, &identity, Duration::from_secs(100 * 3600))
        .await
        .unwrap();
    let cert = WorkloadCertificate::from_ca_response(identity, &chain, req.key, &[]).unwrap();
    assert!(cert.remaining() <= MAX_TTL, "{:?}", cert.remaining());
    assert!(
        cert.remaining() > MAX_TTL - Duration::from_secs(60),
        "{:?}",
        cert.remaining()
    );
}

#[tokio::test]
async fn ca_down_is_unavailable_then_recovers() {
    let mut f = Fixture::new("down").await;
    let client = f.client(&f.dir.join("token-a"));
    sign(&client, &id("sleep"), Duration::ZERO).await.unwrap();
    f.stop().await;
    match sign(&client, &id("sleep"), Duration::ZERO).await {
        Err(CaClientError::Unavailable(msg)) => {
            assert!(
                msg.contains("cannot reach CA") && msg.contains(&f.addr.to_string()),
                "{msg}"
            )
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    f.start().await;
    sign(&client, &id("sleep"), Duration::ZERO)
        .await
        .expect("works again once the CA is back");
}

#[tokio::test]
async fn untrusted_ca_is_a_tls_error() {
    let f = Fixture::new("tls").await;
    let other = CertificateAuthority::new(CaOptions::new("cluster.local")).unwrap();
    let wrong_root = f.dir.join("wrong-root.pem");
    std::fs::write(&wrong_root, other.root_cert_pem()).unwrap();
    let client = GrpcCaClient::new(
        &format!("https://{}", f.addr),
        &wrong_root,
        Some(f.dir.join("token-a")),
    )
    .unwrap();
    match sign(&client, &id("sleep"), Duration::ZERO).await {
        Err(CaClientError::Unavailable(msg)) => assert!(msg.contains("TLS"), "{msg}"),
        other => panic!("expected a TLS failure, got {other:?}"),
    }
}

/// `ALT_CA_HOSTNAME`: the name checked is the one given, not the address's host. The
/// serving certificate names istiod's service and the listening IP.
#[tokio::test]
async fn the_ca_certificate_is_checked_against_the_alternative_name() {
    let f = Fixture::new("altname").await;
    let with_name = |name: &str| {
        let opts = crate::identity::ca_client::CaDialOptions {
            tls_name: Some(name.to_string()),
            headers: vec![("x-tenant".into(), "blue".into())],
        };
        GrpcCaClient::with_options(
            &format!("https://{}", f.addr),
            f.root_path(),
            Some(f.dir.join("token-a")),
            opts,
        )
        .unwrap()
    };
    let ok = with_name(ISTIOD_DNS_NAME);
    sign(&ok, &id("sleep"), Duration::from_secs(600))
        .await
        .unwrap();
    let wrong = with_name("ca.elsewhere.example");
    match sign(&wrong, &id("sleep"), Duration::ZERO).await {
        Err(CaClientError::Unavailable(msg)) => {
            assert!(msg.contains("TLS") || msg.contains("certificate"), "{msg}")
        }
        other => panic!("expected a TLS failure, got {other:?}"),
    }
    let bad = crate::identity::ca_client::CaDialOptions {
        tls_name: None,
        headers: vec![("bad header".into(), "v".into())],
    };
    let e = GrpcCaClient::with_options("https://127.0.0.1:1", f.root_path(), None::<&Path>, bad)
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("bad header"), "{e:#}");
}

#[tokio::test]
async fn client_rejects_bad_settings() {
    let f = Fixture::new("settings").await;
    let token = Some(f.dir.join("token-a"));
    let e = GrpcCaClient::new("127.0.0.1:15012", f.root_path(), token.clone())
        .err()
        .unwrap();
    assert!(e.to_string().contains("https://HOST:PORT"), "{e}");
    let e = GrpcCaClient::new(
        "https://127.0.0.1:1",
        f.dir.join("missing.pem"),
        token.clone(),
    )
    .err()
    .unwrap();
    assert!(format!("{e:#}").contains("missing.pem"), "{e:#}");
    let e = GrpcCaClient::new("https://127.0.0.1:1", f.dir.join("tokens"), token)
        .err()
        .unwrap();
    assert!(e.to_string().contains("no PEM certificate"), "{e}");
}

#[tokio::test]
async fn secret_manager_fetches_over_grpc() {
    let f = Fixture::new("manager").await;
    let client = Arc::new(f.client(&f.dir.join("token-a")));
    let mgr = SecretManager::new(client, SecretManagerOptions::default());
    let cert = mgr.fetch(&id("sleep")).await.unwrap();
    assert_eq!(cert.identity, id("sleep"));
    assert_eq!(cert.roots[0], f.ca.root_cert_der());
    // Granted the CA's cap, not the 24h asked for.
    assert!(cert.remaining() <= MAX_TTL);
    verify_chain(&cert.chain[0], &cert.roots[0]);
}

/// A waypoint's token: it obtains its own identity, which no workload of the file has, by
/// asking as a waypoint does (no `ImpersonatedIdentity`), and also when it names itself.
#[tokio::test]
async fn identity_token_obtains_its_own_identity() {
    let f = Fixture::new("own").await;
    let root = parse_pem_certs(&std::fs::read_to_string(f.root_path()).unwrap()).unwrap();
    for client in [
        f.own_client(&f.dir.join("token-wp")),
        f.client(&f.dir.join("token-wp")),
    ] {
        let chain = sign(&client, &id("waypoint"), Duration::from_secs(600))
            .await
            .unwrap();
        let leaf = parse_pem_certs(&chain[0]).unwrap().remove(0);
        assert_eq!(identity_from_cert(&leaf).unwrap(), id("waypoint"));
        verify_chain(&leaf, &root[0]);
    }
    // Through the secret manager, as the test waypoint gets its certificate.
    let client = Arc::new(f.own_client(&f.dir.join("token-wp")));
    let mgr = SecretManager::new(client, SecretManagerOptions::default());
    let cert = mgr.fetch(&id("waypoint")).await.unwrap();
    assert_eq!(cert.identity, id("waypoint"));
}

#[tokio::test]
async fn identity_token_obtains_no_other_identity() {
    let f = Fixture::new("own-other").await;
    // A CSR for another identity, of this trust domain or another.
    let own = f.own_client(&f.dir.join("token-wp"));
    let msg = rejected(sign(&own, &id("sleep"), Duration::ZERO).await);
    assert!(
        msg.contains("PermissionDenied")
            && msg.contains(
                "spiffe://cluster.local/ns/default/sa/waypoint obtains only that identity"
            )
            && msg.contains("spiffe://cluster.local/ns/default/sa/sleep"),
        "{msg}"
    );
    let foreign = Identity::new("example.org", "default", "waypoint");
    let msg = rejected(sign(&own, &foreign, Duration::ZERO).await);
    assert!(
        msg.contains("PermissionDenied") && msg.contains("example.org"),
        "{msg}"
    );
    // Impersonating another identity, even one of a workload in the file.
    let impersonating = f.client(&f.dir.join("token-wp"));
    let msg = rejected(sign(&impersonating, &id("sleep"), Duration::ZERO).await);
    assert!(
        msg.contains("PermissionDenied")
            && msg
                .contains("not spiffe://cluster.local/ns/default/sa/sleep (ImpersonatedIdentity)"),
        "{msg}"
    );
    // ImpersonatedIdentity naming itself, with a CSR for another identity.
    let req = csr::generate(&id("sleep")).unwrap();
    let msg = rejected(
        impersonating
            .sign(req.csr_pem, &id("waypoint"), Duration::ZERO)
            .await,
    );
    assert!(
        msg.contains("PermissionDenied") && msg.contains("obtains only that identity"),
        "{msg}"
    );
}

/// A node token asking without `ImpersonatedIdentity` is told both ways to ask.
#[tokio::test]
async fn node_token_without_impersonation_is_told_how_to_ask() {
    let f = Fixture::new("node-own").await;
    let own = f.own_client(&f.dir.join("token-a"));
    // Even for the identity of a workload on that node: a node proxy names it.
    let msg = rejected(sign(&own, &id("sleep"), Duration::ZERO).await);
    assert!(msg.contains("PermissionDenied"), "{msg}");
    assert!(
        msg.contains("node node-a asked for a certificate for spiffe://cluster.local/ns/default/sa/sleep without ImpersonatedIdentity"),
        "{msg}"
    );
    assert!(
        msg.contains("`<token> spiffe://cluster.local/ns/<ns>/sa/<sa>`"),
        "{msg}"
    );
}

/// Tokens move between callers with an edit of the tokens file.
#[tokio::test]
async fn follows_edits_of_identity_tokens() {
    let f = Fixture::new("own-edit").await;
    let own = f.own_client(&f.dir.join("token-wp"));
    sign(&own, &id("waypoint"), Duration::ZERO).await.unwrap();
    std::fs::write(
        f.dir.join("tokens"),
        "tok-a node-a\ntok-wp spiffe://cluster.local/ns/default/sa/gateway\n",
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sign(&own, &id("gateway"), Duration::ZERO).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the edit was not picked up"
        );
        tokio::time::sleep(RELOAD).await;
    }
    rejected(sign(&own, &id("waypoint"), Duration::ZERO).await);
}
