//! The control plane's CA endpoint: Istio's `IstioCertificateService/CreateCertificate` over
//! TLS, signing with the built-in [`CertificateAuthority`].
//!
//! Who may have what, by the caller its bearer token names (see [`super::tokens`]):
//! - a node asks on behalf of a workload by naming the workload's SPIFFE URI as
//!   `ImpersonatedIdentity`; it gets that identity only if the workload file places a
//!   workload with that identity on that node. So a compromised node can mint the identities
//!   of its own workloads, and no others.
//! - a token given to a SPIFFE identity (a waypoint, gateway, sidecar or dedicated-mode
//!   proxy) gets that identity and no other: its CSR's SAN must be that identity, and an
//!   `ImpersonatedIdentity`, if sent at all, must name it too. The workload file is not
//!   consulted: the operator granted the identity by writing the line.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::metadata::MetadataMap;
use tonic::transport::{Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::tokens::{Caller, Tokens};
use crate::identity::ca::{requested_sans, CaError, CertificateAuthority, ServerCertPem};
use crate::identity::ca_client::{impersonated_identity, IMPERSONATED_IDENTITY};
use crate::identity::Identity;
use crate::proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use crate::xds::LocalConfig;

/// The gRPC service. Tokens and workloads are live views: edits to their files apply to the
/// next request.
pub struct CaService {
    ca: Arc<CertificateAuthority>,
    tokens: watch::Receiver<Arc<Tokens>>,
    workloads: watch::Receiver<Arc<LocalConfig>>,
}

impl CaService {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        tokens: watch::Receiver<Arc<Tokens>>,
        workloads: watch::Receiver<Arc<LocalConfig>>,
    ) -> Self {
        CaService {
            ca,
            tokens,
            workloads,
        }
    }

    /// Who is calling, from `authorization: Bearer <token>`.
    fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let header = metadata.get("authorization").ok_or_else(|| {
            Status::unauthenticated("missing `authorization: Bearer <token>` header")
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| {
                Status::unauthenticated("the authorization header is not `Bearer <token>`")
            })?;
        let tokens = self.tokens.borrow().clone();
        tokens
            .caller_of(token)
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unknown bearer token"))
    }

    /// The identity `caller` may be issued for `req`, or why none.
    fn identity_for(
        &self,
        caller: &Caller,
        req: &IstioCertificateRequest,
    ) -> Result<Identity, Status> {
        let impersonated = impersonated(req)?;
        match (caller, impersonated) {
            (Caller::Node(node), Some(identity)) => {
                self.authorize(node, &identity)?;
                Ok(identity)
            }
            (Caller::Node(node), None) => Err(Status::permission_denied(format!(
                "node {node} asked for a certificate{} without {IMPERSONATED_IDENTITY}: a node \
                 token obtains only its workloads' certificates, each named as \
                 {IMPERSONATED_IDENTITY} in the request metadata; a proxy asking for its own \
                 identity (waypoint, gateway, sidecar, dedicated mode) needs a token given to \
                 that identity in the tokens file: `<token> spiffe://{}/ns/<ns>/sa/<sa>`",
                requested_sans(&req.csr)
                    .map(|sans| format!(" for {}", sans.join(", ")))
                    .unwrap_or_default(),
                self.ca.trust_domain(),
            ))),
            (Caller::Identity(own), Some(other)) if other != *own => {
                Err(Status::permission_denied(format!(
                    "the token of {own} obtains only that identity, not {other} \
                     ({IMPERSONATED_IDENTITY}): only node tokens may impersonate"
                )))
            }
            // Naming itself as ImpersonatedIdentity changes nothing, so it is allowed.
            (Caller::Identity(own), _) => Ok(own.clone()),
        }
    }

    /// A node may obtain an identity only if one of the workloads on it has that identity.
    fn authorize(&self, node: &str, identity: &Identity) -> Result<(), Status> {
        let config = self.workloads.borrow().clone();
        let mut elsewhere = BTreeSet::new();
        for w in config
            .workloads
            .iter()
            .filter(|w| w.identity() == *identity)
        {
            if w.node == node {
                return Ok(());
            }
            elsewhere.insert(if w.node.is_empty() {
                "<no node>"
            } else {
                w.node.as_str()
            });
        }
        let why = if elsewhere.is_empty() {
            "no workload in the workload file has that identity".to_string()
        } else {
            let nodes: Vec<&str> = elsewhere.into_iter().collect();
            format!("its workloads are on node(s) {}", nodes.join(", "))
        };
        Err(Status::permission_denied(format!(
            "node {node} may not obtain a certificate for {identity}: {why}"
        )))
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let caller = self.authenticate(request.metadata())?;
        let req = request.into_inner();
        let identity = self.identity_for(&caller, &req).inspect_err(
            |s| warn!(%caller, reason = %s.message(), "certificate request refused"),
        )?;
        let ttl = u64::try_from(req.validity_duration).map_err(|_| {
            Status::invalid_argument(format!(
                "validity_duration must not be negative, got {}",
                req.validity_duration
            ))
        })?;
        let chain = self
            .ca
            .sign_csr(&req.csr, &identity, Duration::from_secs(ttl))
            .map_err(|e| {
                let status = ca_error_status(&caller, &e);
                warn!(%caller, %identity, error = %e, "certificate request refused");
                status
            })?;
        info!(%caller, %identity, requested_ttl_secs = ttl, "certificate issued");
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

/// The request's `ImpersonatedIdentity`, if it has one.
fn impersonated(req: &IstioCertificateRequest) -> Result<Option<Identity>, Status> {
    impersonated_identity(req.metadata.as_ref())
        .map(|uri| {
            uri.parse()
                .map_err(|e| Status::invalid_argument(format!("{IMPERSONATED_IDENTITY}: {e}")))
        })
        .transpose()
}

fn ca_error_status(caller: &Caller, e: &CaError) -> Status {
    match e {
        // For a node the CSR merely disagrees with its own ImpersonatedIdentity; an identity
        // token's holder is asking for an identity it was not given.
        CaError::IdentityMismatch { .. } | CaError::ForeignTrustDomain { .. }
            if matches!(caller, Caller::Identity(_)) =>
        {
            Status::permission_denied(format!(
                "the token of {caller} obtains only that identity: {e}"
            ))
        }
        CaError::MalformedCsr(_)
        | CaError::BadCsrSignature
        | CaError::IdentityMismatch { .. }
        | CaError::ForeignTrustDomain { .. } => Status::invalid_argument(e.to_string()),
        CaError::Storage { .. } | CaError::Signing(_) => Status::internal(e.to_string()),
    }
}

/// The addresses the serving certificate must name for a listener on `listen`: that address,
/// or, for a wildcard listener, every address of this host (a client may use any of them).
pub fn serving_ips(listen: SocketAddr) -> Vec<IpAddr> {
    let ip = listen.ip();
    if !ip.is_unspecified() {
        return vec![ip];
    }
    let mut ips: BTreeSet<IpAddr> = [IpAddr::from([127, 0, 0, 1])].into();
    if listen.is_ipv6() {
        ips.insert(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]));
    }
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => {
            for a in addrs {
                let Some(sa) = a.address else { continue };
                if let Some(v4) = sa.as_sockaddr_in() {
                    ips.insert(IpAddr::V4(v4.ip()));
                } else if let Some(v6) = sa.as_sockaddr_in6() {
                    // Link-local addresses need a zone to be dialled: no client uses them.
                    let v6 = v6.ip();
                    if listen.is_ipv6() && (v6.segments()[0] & 0xffc0) != 0xfe80 {
                        ips.insert(IpAddr::V6(v6));
                    }
                }
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot list this host's addresses; the CA certificate names loopback only")
        }
    }
    ips.into_iter().collect()
}

/// A running CA server.
pub struct RunningCaServer {
    local_addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningCaServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets in-flight requests finish, and closes the listener.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(());
        self.task
            .await
            .context("CA server task")?
            .context("CA server")
    }
}

/// Serves `service` on `listener` over TLS with `cert` (leaf first, then the root).
pub fn serve(
    service: CaService,
    listener: TcpListener,
    cert: &ServerCertPem,
) -> anyhow::Result<RunningCaServer> {
    serve_with_xds(service, None, listener, cert)
}

/// [`serve`], plus delta xDS on the same port when given (istiod serves both on 15012).
pub fn serve_with_xds(
    service: CaService,
    xds: Option<super::xds_server::XdsService>,
    listener: TcpListener,
    cert: &ServerCertPem,
) -> anyhow::Result<RunningCaServer> {
    let local_addr = listener.local_addr()?;
    let identity = tonic::transport::Identity::from_pem(cert.chain.concat(), &cert.key);
    let mut builder = Server::builder()
        .tls_config(ServerTlsConfig::new().identity(identity))
        .context("CA server TLS settings")?;
    let router = builder
        .add_service(IstioCertificateServiceServer::new(service))
        .add_optional_service(xds.map(super::xds_server::XdsService::into_server));
    let (tx, rx) = oneshot::channel::<()>();
    // tonic's own `TcpIncoming` hands accept errors (EMFILE...) to a loop that retries at
    // once: back off instead.
    let what = format!("CA/xDS server {local_addr}");
    let incoming = futures::stream::unfold(listener, move |listener| {
        let what = what.clone();
        async move {
            let (tcp, _) =
                crate::admin::http::accept_with_backoff(&what, || listener.accept()).await;
            Some((Ok::<_, std::io::Error>(tcp), listener))
        }
    });
    let task = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await
    });
    Ok(RunningCaServer {
        local_addr,
        shutdown: tx,
        task,
    })
}
